"""Health: the rows each worker process writes, and the endpoint reading them."""
