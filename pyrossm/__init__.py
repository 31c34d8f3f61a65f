"""pyrossm (bootstrap; full API written later)."""
