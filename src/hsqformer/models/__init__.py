"""HSQformer models and their building blocks, registered with timm on import."""

from hsqformer.models.hsqformer import HSQformer

__all__ = ["HSQformer"]
