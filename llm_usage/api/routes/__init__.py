"""The API's routes, one `APIRouter` per group; `api/app.py` includes them all."""
