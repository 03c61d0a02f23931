"""What a run does with the prompt a user typed: a prompt past the text encoder's 512 tokens is
reported (a warning, metadata.json, the artifact), and markup or HTML in it shows on the run's page
as text."""
from __future__ import annotations

import json
import logging

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

from flows.generate import generate_video
from flows.request import GenerationRequest
from tests.tasks.rendering import render

HOSTILE = "<img src=x onerror=alert(1)> # [a fox](javascript:alert(1)) | `trots` through **snow**"


def test_a_long_hostile_prompt_is_reported_cut_and_shown_as_text(prefect_server, wan_env):
    prompt = HOSTILE + " and deep snow" * 200  # about 1,000 umT5 tokens
    state = generate_video(GenerationRequest(task="tiny", prompt=prompt, frame_count=5, size="64*64", steps=2,
                                             seed=1), return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id

    tokens = json.loads(state.result().metadata.read_text())["prompt_tokens"]
    assert tokens["prompt"]["kept"] == 512 < tokens["prompt"]["tokens"] and tokens["prompt"]["truncated"]
    assert not tokens["negative_prompt"]["truncated"]

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    warnings = [log.message for log in logs if log.level == logging.WARNING]
    assert f"the prompt has {tokens['prompt']['tokens']} tokens but the text encoder reads only the first 512" \
        in "\n".join(warnings)

    markdown = next(a for a in artifacts if a.key == "generated-video").data
    rendered = render(markdown)
    assert set(rendered.tags) <= {"h1", "ul", "li", "code"} and rendered.attributes == []
    assert rendered.text["h1"] == f"tiny: {' '.join(prompt[:80].split())}"
    assert f"the prompt was cut to its first 512 of {tokens['prompt']['tokens']} tokens" in rendered.text["li"]
