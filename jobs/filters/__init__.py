"""The filters job kind, driver side."""
