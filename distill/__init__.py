"""nanodistill training side: prune a teacher into a student, distill it, quantize, export."""

from distill.offline import set_offline_defaults

set_offline_defaults()

__version__ = "0.1.0"
