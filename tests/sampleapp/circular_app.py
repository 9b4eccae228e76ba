from fastapi import FastAPI

import taskiq_fastapi
from sampleapp.circular_broker import broker

app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
