"""A small FastAPI sign-up service whose welcome e-mails are sent by taskiq tasks."""
