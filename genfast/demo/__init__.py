"""``python -m genfast demo``: four tiny generative models trained on data that ships
with a package (a VAE, a DCGAN generator and a DDPM on scikit-learn's 8x8 digits,
a character-level GPT on docutils' public-domain docstrings), sampled with genfast
and with the plain-PyTorch reference from the same seed.

``models.py`` holds the architectures, ``train.py`` trains them (scikit-learn and
docutils are needed only there), the ``*.pt`` files beside them are the trained
weights, and ``sample.py`` is the demo itself.
"""
