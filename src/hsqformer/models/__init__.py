"""HSQformer models and their building blocks, registered with timm on import.

Also registers the Table 2 baselines that timm lacks: CSWin Transformer
(``cswin_{tiny,small,base,large}_224``), MPViT (``mpvit_{tiny,xsmall,small,base}``)
and ThyNet (``thynet``).
"""

from hsqformer.models.cswin import CSWinTransformer
from hsqformer.models.hsqformer import HSQformer
from hsqformer.models.mpvit import MPViT
from hsqformer.models.thynet import ThyNet

__all__ = ["CSWinTransformer", "HSQformer", "MPViT", "ThyNet"]
