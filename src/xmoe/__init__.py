"""xmoe: sparse Mixture-of-Experts with many small experts and a threshold router (XMoE,
Yang et al., Findings of ACL 2024, arXiv 2403.18926), computing only the pairs it keeps."""

__version__ = "0.1.0"

from xmoe.errors import UsageError

__all__ = ["UsageError", "__version__"]
