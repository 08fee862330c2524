"""The lab: builds, trains, exports, audits and benchmarks models; imports the runtime, never the reverse."""
