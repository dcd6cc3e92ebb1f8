"""Tests of the 3D Slicer module's logic (ThyroidNoduleLib) with real MRML nodes (slicer-core)."""
