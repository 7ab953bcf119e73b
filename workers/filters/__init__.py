"""The filters job kind, actor side: gradient ascent, weight plots."""
