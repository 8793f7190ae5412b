"""The embedded default job, ``llava-getok demo`` (its contract: :mod:`llava_getok.demo.run`): ``run`` the stages,
``data`` the shapes dataset and its curriculum, ``model`` the tiny LLaVA, ``training`` the training run, ``scoring``
predictions, chance levels and the learning curve."""
from .run import main, parser

__all__ = ["main", "parser"]
