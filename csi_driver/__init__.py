"""Ferry: a CSI driver for node-local volumes whose data follows the pod."""

from importlib.metadata import PackageNotFoundError, version

DRIVER_NAME = "ferry.csi.dev"

try:
    __version__ = version("ferry-csi")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
