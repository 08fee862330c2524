"""TinyDefectNet: architecture, FLOP counting, design search and training."""
