"""The online forecasting service: FastAPI over one `streams.Engine`, durable through SQLite."""
