"""Web service: ``create_app(run_dir)`` -> FastAPI app with /predict, /health and an upload page."""
from oncotransfer.serve.app import create_app

__all__ = ["create_app"]
