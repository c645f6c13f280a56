"""whatsapp-worker: drains a MySQL queue of outgoing WhatsApp messages, each sent once."""

__version__ = "0.1.0"
