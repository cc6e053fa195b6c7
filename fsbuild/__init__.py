"""fsbuild: Fastsocket as a quilt series against el6 kernels, built into RPMs and smoke-booted."""

__version__ = "0.1.0"
