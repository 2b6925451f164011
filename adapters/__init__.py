"""Framework adapters of ssmcore, installed as ``ssmcore.adapters``."""
