"""vmlab: a VM lab orchestrator and test harness for Linux AF_VSOCK."""

__version__ = "0.1.0"
