"""Reference recommenders trained and evaluated on the same split and protocol."""
