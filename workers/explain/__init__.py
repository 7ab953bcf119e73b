"""The explain job kind, actor side: read, compute (explain step, CAM methods, metrics), write."""
