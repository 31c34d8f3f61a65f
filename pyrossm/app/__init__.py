"""The ``pyrossm`` command-line application (not the library API).

* :mod:`pyrossm.app.cli` -- the argument parser and entry point (``pyrossm --help``).
* :mod:`pyrossm.app.commands` -- one function per sub-command.
* :mod:`pyrossm.app.runs` -- run folders: configuration, data loading, model building, saving.
* :mod:`pyrossm.app.demo` -- the main job, ``pyrossm demo``.
"""
