"""POST /compat/flow-grpo and /compat/flow-grpo/geneval: Flow-GRPO's reward-server protocol (pickled dicts
in and out, `rewarders/flow_grpo.py`), so a Flow-GRPO run points its remote scorer's `url` here.

Off unless `flow_grpo_compat` is set (404). Behind the API key and the body limits like every work
endpoint (the middleware), and scored through the batcher like /reward: the body is read, admitted,
decoded with the safe unpickler in the preprocessing pool (a pickle that names any global but numpy's
array reconstruction is a 400 and runs nothing), then `MicroBatcher.reward` checks, prepares and scores
it with its neighbours. Errors go through `errors.http_error`; their answers are JSON, which the client's
`pickle.loads` refuses loudly (and Flow-GRPO's session retries only a 500, which these routes never send
for bad input).
"""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from t2i_reward.rewarders import flow_grpo, wire
from t2i_reward.rewarders.errors import InvalidRequestError

from ..deps import AuthDep, BatcherDep, SettingsDep
from ..schemas import error_responses
from .reward import read_body, stop_when_client_goes


def require_enabled(settings: SettingsDep) -> None:
    if not settings.flow_grpo_compat:
        raise HTTPException(404, "the Flow-GRPO endpoints are off: set T2I_SERVICE_FLOW_GRPO_COMPAT=true to serve them")


router = APIRouter(prefix="/compat/flow-grpo", tags=["compat"], dependencies=[AuthDep, Depends(require_enabled)])

ERRORS = error_responses(400, 401, 403, 404, 408, 413, 422, 429, 503, 504)
PICKLE_BODY = {"requestBody": {"required": True, "content": {flow_grpo.MEDIA_TYPE: {"schema": {
    "type": "string", "format": "binary", "description": "pickle.dumps of a dict (Flow-GRPO's client; any content type)"}}}}}


def _answer(answer: dict) -> Response:
    return Response(flow_grpo.encode_answer(answer), media_type=flow_grpo.MEDIA_TYPE)


@router.post("", responses={**ERRORS, 200: {"content": {flow_grpo.MEDIA_TYPE: {}}, "description": "pickle.dumps({'outputs': "
             "[float per image]})"}}, summary="Flow-GRPO's generic remote scorer", openapi_extra=PICKLE_BODY)
async def flow_grpo_scorer(
    request: Request,
    batcher: BatcherDep,
    reward: Annotated[Optional[str], Query(max_length=100, description="One configured expert: its raw score per image "
                                           "instead of the mixture's total.")] = None,
) -> Response:
    """`pickle.dumps({"images": [JPEG bytes], "prompts": [str] or a numpy str array})` in; `{"outputs": [...]}`
    out: each image's total of the configured mixture, or with `?reward=NAME` expert NAME's raw score.
    Every expert scores (prompt, image) pairs, so `prompts` is required (422 without)."""
    if reward is not None and reward not in batcher.rewarder.experts:
        raise InvalidRequestError(f"reward {reward!r} is not one of this service's experts: {', '.join(batcher.rewarder.experts)}")
    batcher.check_admission()  # a full queue is a 429 before the body is read
    data = await read_body(request)
    with batcher.admit(2 * len(data)) as ticket:  # the body and its decoded images, until the pixels replace them
        req = await batcher.prepare(flow_grpo.decode_scorer_request, data, batcher.limits)
        del data
        if req.prompts is None:
            raise InvalidRequestError("'prompts' is required: every expert of this service scores (prompt, image) pairs")
        async with stop_when_client_goes(request, ticket):
            result = await batcher.reward(wire.RewardBody(req.prompts, req.images), ticket=ticket)
    outputs = [im.components[reward] if reward is not None else im.total for im in result.images]
    return _answer({"outputs": outputs})


@router.post("/geneval", responses={**ERRORS, 200: {"content": {flow_grpo.MEDIA_TYPE: {}}, "description": "pickle.dumps"
             "({'scores', 'rewards', 'strict_rewards', 'group_rewards', 'group_strict_rewards'})"}},
             summary="Flow-GRPO's GenEval remote scorer", openapi_extra=PICKLE_BODY)
async def flow_grpo_geneval(request: Request, batcher: BatcherDep) -> Response:
    """`pickle.dumps({"images": [JPEG bytes], "meta_datas": [GenEval record], "only_strict": bool})` in;
    Flow-GRPO's GenEval answer out. Needs the `geneval` expert in the configured mixture (422 without)."""
    batcher.check_admission()
    data = await read_body(request)
    with batcher.admit(2 * len(data)) as ticket:
        req = await batcher.prepare(flow_grpo.decode_geneval_request, data, batcher.limits)
        del data
        if "geneval" not in batcher.rewarder.experts:
            raise InvalidRequestError("this service's mixture has no 'geneval' expert: enable it to serve Flow-GRPO's "
                                      "GenEval reward")
        async with stop_when_client_goes(request, ticket):
            body = wire.RewardBody(req.prompts, req.images, metadata=req.metadata)  # the records go with their pairs
            result = await batcher.reward(body, ticket=ticket)
    # the geneval expert's module (it comes with the expert: imported only once one is configured)
    from t2i_reward.rewarders.geneval_rules import flow_grpo_answer

    def extra(name: str) -> list:  # None where the expert could not score a pair: NaN score, not correct
        return [(im.extras or {}).get(f"geneval.{name}") for im in result.images]

    scores = [float("nan") if v is None else v for v in extra("flow_grpo_score")]
    strict, correct = ([bool(v) for v in extra(name)] for name in ("flow_grpo_strict", "correct"))
    return _answer(flow_grpo_answer(req.metadata, scores, strict, correct, only_strict=req.only_strict))
