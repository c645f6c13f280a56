"""Checks of the deployment files (systemd units, image, compose, alerts, dashboard)."""
