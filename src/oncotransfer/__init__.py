"""oncotransfer: a folder of medical images -> a validated cancer classifier by transfer learning."""
__version__ = "0.1.0"
