"""``/v1/models``: the model cards that workers have loaded (each worker announces its model)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends

from api.deps import StoreDep, get_tenant
from api.schemas import ModelList, ModelOut, error_responses

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(get_tenant)])


@router.get("", response_model=ModelList, responses=error_responses(401, 503))
def list_models(store: StoreDep) -> ModelList:
    """Newest first: sha256, file, format, the card (classes, colours, mpp, licence), when loaded."""
    models = [
        ModelOut(**{**m, "loaded_at": datetime.fromtimestamp(float(m.get("loaded_at", 0)), UTC)})
        for m in store.metrics.models()
    ]
    return ModelList(models=models)
