"""`spqt serve`: an OpenAI-compatible HTTP server over one model.

protocol.py  the wire format (pydantic request / response models, the JSON error object)
text.py      token ids -> text pieces, with stop strings
scheduler.py the FIFO queue and the single worker thread that runs requests one at a time
engine.py    the served model (Generator + tokenizer) and how one request runs on it
app.py       the FastAPI routes, checks and server-sent events
server.py    uvicorn: binding, logging, clean shutdown on signals
"""
