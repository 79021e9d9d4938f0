"""modpo-pipe: align one policy to several reward models with the reward-model-only MODPO recipe."""

__version__ = "0.1.0"
