"""The operator's surface: admin endpoint, metrics, dashboard, logs, `anubis top`, status line."""
