"""oryx_ts test suite (a regular package, so `tests.conftest` never resolves to another distribution's `tests`)."""
