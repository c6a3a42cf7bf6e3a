"""Suite-wide settings: no per-example deadline (CI machines are loaded and noisy)."""

from hypothesis import settings

settings.register_profile("dispers", deadline=None, print_blob=True)
settings.load_profile("dispers")
