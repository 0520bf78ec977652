"""3D flow from RGB-D logs: extraction (OpenCV DIS + kornia geometry) and evaluation."""
