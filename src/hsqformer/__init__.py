"""HSQformer: Hierarchical Sparse Query Transformer for ultrasound HCC screening.

Importing the package registers the HSQformer variants with timm, so that
``timm.create_model("hsqformer_base", num_classes=2)`` works afterwards.
"""

from hsqformer import models as models
from hsqformer.models import HSQformer as HSQformer

__version__ = "0.1.0"
__all__ = ["HSQformer", "models", "__version__"]
