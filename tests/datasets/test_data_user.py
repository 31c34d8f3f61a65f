"""User data files: CSV / NumPy round trips, NaN as missing, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyrossm.datasets import load_array, save_array

F64 = torch.float64


def _assert_same(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _data(shape, seed=0):
    array = np.random.default_rng(seed).normal(size=shape)
    array.flat[::5] = np.nan
    return array


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize("shape", [(7,), (7, 3), (4, 7, 3)])
def test_numpy_round_trip(tmp_path, suffix, shape):
    array = _data(shape)
    path = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    else:
        np.savez(path, array)
    expected = (
        array.reshape((1,) * (3 - array.ndim) + array.shape)
        if array.ndim > 1
        else (array[None, :, None])
    )
    x = load_array(path, dtype=F64)
    _assert_same(x, expected)
    assert torch.isnan(x).sum() == np.isnan(array).sum()


def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,b\n1,2\n3,\n,6.5\nNaN,NA\n")
    (tmp_path / "n.csv").write_text("1,2\n3,4\n")
    nan = float("nan")
    _assert_same(
        load_array(tmp_path / "h.csv", dtype=F64), [[[1, 2], [3, nan], [nan, 6.5], [nan, nan]]]
    )
    _assert_same(load_array(tmp_path / "n.csv", dtype=F64), [[[1, 2], [3, 4]]])


@pytest.mark.parametrize("text", ["t;u\n1;2\n3;4\n", "t\tu\n1\t2\n3\t4\n", "1 2\n3   4\n"])
def test_other_delimiters(tmp_path, text):
    path = tmp_path / "d.txt"
    path.write_text(text)
    _assert_same(load_array(path, dtype=F64), [[[1, 2], [3, 4]]])


def test_single_column_csv(tmp_path):
    (tmp_path / "s.csv").write_text("flow\n1120\n1160\n\n963\n")
    _assert_same(load_array(tmp_path / "s.csv", dtype=F64), [[[1120], [1160], [963]]])


def test_save_array_round_trips(tmp_path):
    x = torch.as_tensor(_data((3, 6, 2)))
    for name in ("x.npy", "x.npz"):
        _assert_same(load_array(save_array(tmp_path / name, x), dtype=F64), x)
    _assert_same(load_array(save_array(tmp_path / "x.csv", x[:1]), dtype=F64), x[:1])
    with pytest.raises(ValueError, match="one sequence"):
        save_array(tmp_path / "y.csv", x)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, time, features\)"):
        save_array(tmp_path / "y.npy", x[0])


def test_in_memory_inputs_dtype_device():
    x = load_array(torch.arange(6.0).reshape(3, 2))
    assert x.shape == (1, 3, 2) and x.dtype == torch.float32
    assert load_array([1, 2, 3], dtype=F64).shape == (1, 3, 1)
    assert load_array(np.zeros((2, 3, 4), dtype=np.int32), device="cpu").shape == (2, 3, 4)


def test_npz_keys(tmp_path):
    np.savez(tmp_path / "k.npz", a=np.ones((2, 1)), b=np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"several arrays \['a', 'b'\]"):
        load_array(tmp_path / "k.npz")
    assert load_array(tmp_path / "k.npz", key="b").shape == (1, 3, 1)
    with pytest.raises(ValueError, match="key: expected one of"):
        load_array(tmp_path / "k.npz", key="c")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 5, 1)), lengths=np.array([5, 3]))
    assert load_array(tmp_path / "x.npz").shape == (2, 5, 1)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3, 4\)"):
        load_array(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="got shape \\(\\)"):
        load_array(np.float64(3.0))
    with pytest.raises(ValueError, match="non-empty"):
        load_array(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="numeric"):
        load_array(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="inf"):
        load_array([1.0, float("inf")])
    with pytest.raises(ValueError, match="rectangular"):
        load_array([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="dtype"):
        load_array([1.0], dtype=torch.int64)
    (tmp_path / "bad.csv").write_text("date,flow\n1871-01-01,1120\n")
    with pytest.raises(ValueError, match="'1871-01-01' at line 2, column 1"):
        load_array(tmp_path / "bad.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="expected 2 columns on every row, got 1 on line 2"):
        load_array(tmp_path / "ragged.csv")
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(ValueError, match="empty file"):
        load_array(tmp_path / "empty.csv")
    (tmp_path / "header_only.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="after the header"):
        load_array(tmp_path / "header_only.csv")
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"expected a \.csv"):
        load_array(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_array(tmp_path / "missing.npy")


def test_pandas_written_csv(tmp_path):
    """pandas writes a missing value of a one-column frame as "" and its index as a first
    column with an empty header: both load as the user means them."""
    pd = pytest.importorskip("pandas")
    nan = float("nan")
    pd.Series([1.0, nan, 3.0, 4.0], name="co2").to_csv(tmp_path / "one.csv", index=False)
    got = load_array(tmp_path / "one.csv", dtype=torch.float64)
    assert got.shape == (1, 4, 1)
    torch.testing.assert_close(got.reshape(-1), torch.tensor([1.0, nan, 3.0, 4.0],
                               dtype=torch.float64), equal_nan=True)
    pd.DataFrame({"a": [1.0, nan, 3.0], "b": [5.0, 6.0, nan]}).to_csv(tmp_path / "idx.csv")
    got = load_array(tmp_path / "idx.csv", dtype=torch.float64)
    assert got.shape == (1, 3, 2)
    torch.testing.assert_close(got[0], torch.tensor([[1.0, 5.0], [nan, 6.0], [3.0, nan]],
                               dtype=torch.float64), equal_nan=True)
