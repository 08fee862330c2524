"""Line simulators that speak only the wire protocol: cameras (frames in) and a PLC bridge (verdicts out)."""
