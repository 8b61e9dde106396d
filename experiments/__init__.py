"""absl entry points; run as `python -m experiments.<name> --config configs/<file>.py:<arg>`."""
