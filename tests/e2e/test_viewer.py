"""The explanation viewer in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

It runs in a gateway process of its own that requires API keys, in front of the session stack's vLLM, Redis and
explainer. Screenshots go to test-artifacts/ (gitignored), desktop and phone width.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sightline.types import Explanation
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import LocalStack, free_port
from server.keys import hash_key, new_key
from tests.e2e.test_generation import FRANCE
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TRACE_URL = "http://phoenix.example/traces/{trace_id}"
PHONE = (390, 844)
# Headless, and every host name but 127.0.0.1 unresolvable: the page must load nothing from elsewhere.
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


@dataclass(frozen=True)
class ViewerGateway:
    url: str
    keys: dict[str, str]
    inference: inference_pb2_grpc.InferenceServiceStub


@pytest.fixture(scope="module")
def viewer_gateway(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerGateway]:
    keys = {tenant: new_key() for tenant in ("acme", "globex")}
    key_file = tmp_path_factory.mktemp("viewer-keys") / "keys.json"
    entries = [{"id": f"{t}-1", "tenant": t, "sha256": hash_key(k).hex()} for t, k in keys.items()]
    key_file.write_text(json.dumps({"keys": entries}))
    port = free_port()
    env = {
        "SIGHTLINE_API_KEYS_FILE": str(key_file),
        "SIGHTLINE_VIEWER_LISTEN": f"127.0.0.1:{port}",
        "SIGHTLINE_TRACE_URL_TEMPLATE": TRACE_URL,
    }
    with GatewayProcess(stack, "viewer-gateway", env) as process, grpc.insecure_channel(process.address) as channel:
        yield ViewerGateway(f"http://127.0.0.1:{port}", keys, inference_pb2_grpc.InferenceServiceStub(channel))


@pytest.fixture(scope="module")
def france(viewer_gateway: ViewerGateway) -> inference_pb2.GenerateResponse:
    """The France question, explained for tenant acme with two methods, word aggregation and faithfulness."""
    response = viewer_gateway.inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE),
            sampling=types_pb2.SamplingParams(max_tokens=10),
            explain=types_pb2.ExplainSpec(
                methods=[types_pb2.MethodSpec(name="input_x_gradient"), types_pb2.MethodSpec(name="logit_lens")],
                aggregation=types_pb2.AggregationSpec(granularity=types_pb2.GRANULARITY_WORD),
                faithfulness=True,
            ),
        ),
        metadata=(("authorization", f"Bearer {viewer_gateway.keys['acme']}"),),
        timeout=600,
    )
    assert response.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, response.explanation.error
    assert " Paris" in [t.text for t in response.output_tokens], response.text
    return response  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.fail("chromedriver is not installed; `make test` installs chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(browser: WebDriver, css: str, timeout: float = 30) -> None:
    WebDriverWait(browser, timeout).until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, css)))


def attribute(node: WebElement, name: str) -> str:
    value = node.get_attribute(name)
    assert value is not None, f"no {name} on {node.tag_name}"
    return value


def use_key(browser: WebDriver, key: str) -> None:
    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()


def test_no_key_or_a_wrong_key_gets_no_data(
    viewer_gateway: ViewerGateway, france: inference_pb2.GenerateResponse, browser: WebDriver
) -> None:
    api = f"{viewer_gateway.url}/api/explanations"
    assert httpx.get(api, timeout=10).status_code == 401
    assert httpx.get(api, headers={"Authorization": "Bearer sl_wrong"}, timeout=10).status_code == 401
    own = httpx.get(
        f"{api}/{france.explanation_id}", headers={"Authorization": f"Bearer {viewer_gateway.keys['acme']}"}
    )
    assert own.status_code == 200 and own.json()["explanation_id"] == france.explanation_id
    # Another tenant's explanation is missing, exactly like an unknown id; and its list does not hold it.
    other = {"Authorization": f"Bearer {viewer_gateway.keys['globex']}"}
    assert httpx.get(f"{api}/{france.explanation_id}", headers=other, timeout=10).status_code == 404
    assert httpx.get(f"{api}/exp_unknown", headers=other, timeout=10).status_code == 404
    assert france.explanation_id not in httpx.get(api, headers=other, timeout=10).text

    browser.get(f"{viewer_gateway.url}/explanations/{france.explanation_id}")
    wait(browser, "#status.error")
    assert "API key" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "detail").is_displayed()
    use_key(browser, "sl_not_a_key")
    wait(browser, "#status.error")
    assert "not valid" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, ".token, .explanation-row") == []


def test_the_france_explanation_renders_and_paris_shows_its_sources_in_api_order(
    stack: LocalStack, viewer_gateway: ViewerGateway, france: inference_pb2.GenerateResponse, browser: WebDriver
) -> None:
    browser.get(viewer_gateway.url + "/")
    use_key(browser, viewer_gateway.keys["acme"])
    row = f'.explanation-row[data-id="{france.explanation_id}"]'
    wait(browser, row)
    browser.find_element(By.CSS_SELECTOR, row).click()
    wait(browser, "#tokens .token")
    assert browser.current_url.endswith(f"/explanations/{france.explanation_id}")

    explanation = Explanation.from_proto(france.explanation)
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
    assert [t.get_attribute("textContent") for t in tokens] == [t.text for t in explanation.tokens]
    link = browser.find_element(By.ID, "trace-link")
    assert link.get_attribute("href") == TRACE_URL.replace("{trace_id}", france.trace_id)
    fidelity = browser.find_element(By.ID, "fidelity")
    gap = france.explanation.fidelity.max_abs_logprob_diff
    assert float(attribute(fidelity, "data-value")) == pytest.approx(gap, rel=1e-6)
    assert "max |served - recomputed log-prob|" in fidelity.text

    paris_index = next(i for i, p in enumerate(explanation.target_positions) if explanation.tokens[p].text == " Paris")
    paris = explanation.target_positions[paris_index]
    browser.find_element(By.CSS_SELECTOR, f'.token.target[data-position="{paris}"]').click()
    wait(browser, "#sources li")
    shown = [int(attribute(li, "data-position")) for li in browser.find_elements(By.CSS_SELECTOR, "#sources li")]
    expected = explanation.top_sources(paris_index, k=10, method="input_x_gradient")
    assert shown == [s.position for s in expected]
    # The heatmap colours the prefix of " Paris" by the same scores.
    first = browser.find_element(By.CSS_SELECTOR, f'.token[data-position="{expected[0].position}"]')
    assert float(attribute(first, "data-score")) == pytest.approx(expected[0].score, abs=1e-6)
    steps = browser.find_element(By.ID, "steps").text
    assert explanation.step_scores is not None
    assert f"{explanation.step_scores.probabilities[paris_index]:.4f}" in steps
    # The alternatives are named by their text, which the gateway gets from vLLM's tokenizer.
    top_ids = explanation.step_scores.top_token_ids
    k = top_ids.shape[1]
    alternatives = list(top_ids.values[paris_index * k : (paris_index + 1) * k])
    texts = [
        httpx.post(
            f"{stack.config.vllm_url}/detokenize", json={"model": france.model, "tokens": [i]}, timeout=10
        ).json()["prompt"]
        for i in alternatives
    ]

    def alternatives_shown() -> str:  # re-found each time: the row is redrawn when the texts arrive
        cell = browser.find_element(By.CSS_SELECTOR, '#steps td[data-row="alternatives (p)"]')
        return attribute(cell, "textContent")

    WebDriverWait(browser, 30).until(lambda _: "#" not in alternatives_shown())
    shown_texts = alternatives_shown().split("\n")
    assert [line.rsplit(" ", 1)[0] for line in shown_texts] == [json.dumps(t, ensure_ascii=False) for t in texts]
    # Word aggregation: the same ranking over source groups as the SDK's.
    browser.find_element(By.CSS_SELECTOR, '#granularity button[data-value="group"]').click()
    wait(browser, "#group-sources li")
    groups = [int(attribute(li, "data-group")) for li in browser.find_elements(By.CSS_SELECTOR, "#group-sources li")]
    expected_groups = explanation.top_groups(paris_index, k=10, method="input_x_gradient")
    assert groups == [explanation.source_groups.index(group) for group, _ in expected_groups]
    # Logit lens grid: one row per layer (embedding output included), one column per explained token.
    assert (
        len(browser.find_elements(By.CSS_SELECTOR, "#lens tbody tr"))
        == explanation.results["logit_lens"].extras["top_token_ids"].shape[0]
    )
    verdict = browser.find_element(By.CSS_SELECTOR, '#faithfulness tr[data-method="input_x_gradient"] .verdict').text
    faithfulness = france.explanation.results[0].faithfulness
    beats = faithfulness.aopc_comprehensiveness > faithfulness.random_aopc_comprehensiveness
    assert verdict == ("beats random" if beats else "no better than random")

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "viewer-desktop.png"))

    # Phone width: nothing wider than the screen, tokens wrap instead.
    browser.set_window_size(*PHONE)
    inner_width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= inner_width
    box = browser.find_element(By.ID, "tokens").rect
    assert box["x"] >= 0 and box["x"] + box["width"] <= inner_width
    browser.save_screenshot(str(ARTIFACTS / "viewer-phone.png"))
    assert (ARTIFACTS / "viewer-phone.png").stat().st_size > 0
