package sightline_test

// Tests against a live gateway (vLLM, Redis and an explainer behind it), which
// tests/e2e/test_go_client.py starts and passes in the environment:
//
//	SIGHTLINE_TEST_TARGET          a plaintext gateway without authentication
//	SIGHTLINE_TEST_SECURED_TARGET  a TLS gateway that requires SIGHTLINE_TEST_API_KEY,
//	SIGHTLINE_TEST_CA              with a certificate signed by this PEM CA
//	SIGHTLINE_TEST_DUMP            where to write the decoded explanation for the cross-language check
//
// Without SIGHTLINE_TEST_TARGET they skip, so that `go test ./...` runs the unit tests alone.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/sightline/sightline-go/sightline"
	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// The SYNC calls wait for an explanation computed on two shared CPU cores.
const liveCallTimeout = 5 * time.Minute

var question = sightline.Chat(sightline.User("What is the capital of France?"))

func liveClient(t *testing.T) (*sightline.Client, context.Context) {
	t.Helper()
	target := os.Getenv("SIGHTLINE_TEST_TARGET")
	if target == "" {
		t.Skip("SIGHTLINE_TEST_TARGET is not set (tests/e2e/test_go_client.py sets it)")
	}
	client, err := sightline.Dial(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), liveCallTimeout)
	t.Cleanup(cancel)
	return client, ctx
}

func maxTokens(n int32) *sightlinev1.SamplingParams {
	return &sightlinev1.SamplingParams{MaxTokens: &n}
}

func TestLiveListMethods(t *testing.T) {
	client, ctx := liveClient(t)
	response, err := client.Explanations.ListMethods(ctx, &sightlinev1.ListMethodsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	methods := map[string]*sightlinev1.MethodInfo{}
	for _, method := range response.Methods {
		methods[method.Name] = method
	}
	for _, name := range []string{"input_x_gradient", "logit_lens", "integrated_gradients"} {
		if methods[name] == nil || methods[name].Description == "" {
			t.Errorf("ListMethods lacks %s (or its description): %v", name, response.Methods)
		}
	}
	if !methods["input_x_gradient"].GetAttributesTokens() || methods["logit_lens"].GetAttributesTokens() {
		t.Error("input_x_gradient attributes to tokens and logit_lens does not")
	}
	if response.Model == "" {
		t.Error("ListMethods names no model")
	}
}

// The README's question, explained in SYNC mode; GetExplanation returns the same record; the
// decoded matrices and top sources go to SIGHTLINE_TEST_DUMP for the Python side to compare.
func TestLiveGenerateWithSyncExplanation(t *testing.T) {
	client, ctx := liveClient(t)
	response, err := client.Inference.Generate(ctx, &sightlinev1.GenerateRequest{
		Input:    question,
		Sampling: maxTokens(16),
		Explain:  sightline.Explain("input_x_gradient", "logit_lens"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(response.Text, "Paris") {
		t.Fatalf("the answer %q does not name Paris", response.Text)
	}
	explanation := response.Explanation
	if explanation.GetState() != sightlinev1.ExplanationState_EXPLANATION_STATE_SUCCEEDED || explanation.ExplanationId != response.ExplanationId {
		t.Fatalf("explanation %s is %s (%s)", explanation.GetExplanationId(), explanation.GetState(), explanation.GetError().GetMessage())
	}
	if diff := explanation.Fidelity.MaxAbsLogprobDiff; diff >= 0.02 {
		t.Errorf("the explainer's log-probabilities differ from vLLM's by %g", diff)
	}
	output := explanation.Tokens[explanation.PromptLength:]
	if len(output) != len(response.OutputTokens) {
		t.Fatalf("%d explained output tokens for %d generated", len(output), len(response.OutputTokens))
	}
	for i, token := range response.OutputTokens {
		if output[i].Id != token.Id {
			t.Fatalf("output token %d is %d in the explanation, %d in the response", i, output[i].Id, token.Id)
		}
	}

	matrix, err := sightline.Attributions(explanation, "input_x_gradient")
	if err != nil {
		t.Fatal(err)
	}
	if len(matrix) != len(explanation.TargetPositions) || len(matrix[0]) != len(explanation.Tokens)-1 {
		t.Fatalf("attributions are %dx%d for %d targets and %d tokens", len(matrix), len(matrix[0]), len(explanation.TargetPositions), len(explanation.Tokens))
	}
	paris, found := sightline.TargetIndex(explanation, " Paris")
	if !found {
		t.Fatalf("no explained token \" Paris\" in %q", response.Text)
	}
	sources, err := sightline.TopSources(explanation, "input_x_gradient", paris, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(sources) != 3 {
		t.Fatalf("%d top sources", len(sources))
	}
	for i, source := range sources {
		if source.Position >= int(explanation.TargetPositions[paris]) || source.Score != matrix[paris][source.Position] {
			t.Errorf("source %+v is not a cell of the target's causal prefix", source)
		}
		if i > 0 && math.Abs(float64(source.Score)) > math.Abs(float64(sources[i-1].Score)) {
			t.Errorf("sources are not strongest first: %+v", sources)
		}
	}

	// Ranked among the user's words only, the sources are tokens of the question (message 0).
	content, err := sightline.TopContentSources(explanation, "input_x_gradient", paris, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, source := range content {
		if source.Token.GetRole() != sightlinev1.TokenRole_TOKEN_ROLE_USER || source.Token.GetMessageIndex() != 0 {
			t.Errorf("content source %+v is not a token of the user's message", source)
		}
	}
	if len(content) != 3 {
		t.Errorf("%d content sources of the question's tokens", len(content))
	}

	fetched, err := client.Explanations.GetExplanation(ctx, &sightlinev1.GetExplanationRequest{ExplanationId: response.ExplanationId})
	if err != nil {
		t.Fatal(err)
	}
	if len(fetched.Explanation.Results) != 2 {
		t.Fatalf("GetExplanation returned %d results", len(fetched.Explanation.Results))
	}
	for i, result := range fetched.Explanation.Results {
		if !proto.Equal(result, explanation.Results[i]) {
			t.Errorf("GetExplanation's %s result differs from the one Generate attached", result.Method)
		}
	}
	dump(t, explanation)
}

// What the cross-language check compares: every attributing method's matrix and every target's
// top 5 sources (of all tokens, and of the caller's), float32 values widened exactly to float64.
type decoded struct {
	ExplanationID string                       `json:"explanation_id"`
	Matrices      map[string][][]float64       `json:"matrices"`
	TopSources    map[string][][]decodedSource `json:"top_sources"`
	// The same, over the caller's own tokens only (TopContentSources).
	TopContentSources map[string][][]decodedSource `json:"top_content_sources"`
}

type decodedSource struct {
	Position int     `json:"position"`
	TokenID  int32   `json:"token_id"`
	Text     string  `json:"text"`
	Score    float64 `json:"score"`
}

func dump(t *testing.T, explanation *sightlinev1.Explanation) {
	path := os.Getenv("SIGHTLINE_TEST_DUMP")
	if path == "" {
		return
	}
	out := decoded{explanation.ExplanationId, map[string][][]float64{}, map[string][][]decodedSource{}, map[string][][]decodedSource{}}
	for _, result := range explanation.Results {
		matrix, err := sightline.Attributions(explanation, result.Method)
		if err != nil {
			continue // logit_lens attributes to no tokens
		}
		for _, row := range matrix {
			widened := make([]float64, len(row))
			for i, value := range row {
				widened[i] = float64(value)
			}
			out.Matrices[result.Method] = append(out.Matrices[result.Method], widened)
		}
		for target := range explanation.TargetPositions {
			out.TopSources[result.Method] = append(out.TopSources[result.Method], decodeSources(t, sightline.TopSources, explanation, result.Method, target))
			out.TopContentSources[result.Method] = append(out.TopContentSources[result.Method], decodeSources(t, sightline.TopContentSources, explanation, result.Method, target))
		}
	}
	encoded, err := json.Marshal(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, encoded, 0o600); err != nil {
		t.Fatal(err)
	}
}

func decodeSources(
	t *testing.T, rank func(*sightlinev1.Explanation, string, int, int) ([]sightline.Source, error),
	explanation *sightlinev1.Explanation, method string, target int,
) []decodedSource {
	sources, err := rank(explanation, method, target, 5)
	if err != nil {
		t.Fatal(err)
	}
	row := []decodedSource{}
	for _, source := range sources {
		row = append(row, decodedSource{source.Position, source.Token.Id, source.Token.Text, float64(source.Score)})
	}
	return row
}

func TestLiveGenerateStream(t *testing.T) {
	client, ctx := liveClient(t)
	request := &sightlinev1.GenerateRequest{Input: question, Sampling: maxTokens(8)}
	unexplained, err := client.Inference.Generate(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	// The same request message serves both calls.
	request.Explain = sightline.Explain("logit_lens")
	stream, err := client.Inference.GenerateStream(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	var messages []*sightlinev1.GenerateStreamResponse
	text := ""
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		messages = append(messages, message)
		text += message.GetDelta().GetTextDelta()
	}
	if len(messages) < 3 {
		t.Fatalf("%d stream messages: a start, deltas and an end were expected", len(messages))
	}
	if text != unexplained.Text {
		t.Errorf("the stream's text %q differs from Generate's %q (greedy decoding)", text, unexplained.Text)
	}
	start, end := messages[0].GetStart(), messages[len(messages)-1].GetEnd()
	if start == nil || len(start.PromptTokenIds) == 0 || end == nil {
		t.Fatalf("the stream does not open with a start carrying the prompt and close with an end: %v ... %v", messages[0], messages[len(messages)-1])
	}
	for _, middle := range messages[1 : len(messages)-1] {
		if middle.GetDelta() == nil {
			t.Errorf("a message between start and end is not a delta: %v", middle)
		}
	}
	if end.FinishReason == sightlinev1.FinishReason_FINISH_REASON_UNSPECIFIED || end.Usage.GetOutputTokens() != int32(len(unexplained.OutputTokens)) {
		t.Errorf("the end message has finish reason %s and usage %v", end.FinishReason, end.Usage)
	}
	if end.Explanation.GetState() != sightlinev1.ExplanationState_EXPLANATION_STATE_SUCCEEDED || end.Explanation.Results[0].Method != "logit_lens" {
		t.Errorf("the end message's explanation is %s", end.Explanation.GetState())
	}
}

func TestLiveBadRequestsAreInvalidArgument(t *testing.T) {
	client, ctx := liveClient(t)
	_, err := client.Inference.Generate(ctx, &sightlinev1.GenerateRequest{Input: question, Explain: sightline.Explain("no_such_method")})
	var typed *sightline.Error
	if !errors.Is(err, sightline.ErrInvalidArgument) || !errors.As(err, &typed) || !strings.Contains(typed.Message, "no_such_method") || !typed.CallerError() {
		t.Fatalf("an unknown method gave %v", err)
	}
	// On a stream the error arrives with the first Recv.
	stream, err := client.Inference.GenerateStream(ctx, &sightlinev1.GenerateRequest{Input: question, Explain: sightline.Explain("no_such_method")})
	if err == nil {
		_, err = stream.Recv()
	}
	if !errors.Is(err, sightline.ErrInvalidArgument) {
		t.Fatalf("an unknown method on the stream gave %v", err)
	}
	_, err = client.Explanations.GetExplanation(ctx, &sightlinev1.GetExplanationRequest{ExplanationId: "no-such-explanation"})
	if !errors.As(err, &typed) || !typed.CallerError() {
		t.Fatalf("an unknown explanation id gave %v", err)
	}
}

func TestLiveAPIKeyOverTLS(t *testing.T) {
	liveClient(t)
	target, key := os.Getenv("SIGHTLINE_TEST_SECURED_TARGET"), os.Getenv("SIGHTLINE_TEST_API_KEY")
	if target == "" || key == "" {
		t.Fatal("SIGHTLINE_TEST_SECURED_TARGET and SIGHTLINE_TEST_API_KEY must be set with SIGHTLINE_TEST_TARGET")
	}
	trust, err := sightline.TLSFromFiles(os.Getenv("SIGHTLINE_TEST_CA"), "", "", "")
	if err != nil {
		t.Fatal(err)
	}
	listMethods := func(options ...sightline.Option) error {
		client, err := sightline.Dial(target, append(options, sightline.WithTLS(trust))...)
		if err != nil {
			return err
		}
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, err = client.Explanations.ListMethods(ctx, &sightlinev1.ListMethodsRequest{})
		return err
	}
	if err := listMethods(sightline.WithAPIKey(key)); err != nil {
		t.Fatalf("the right key over TLS was refused: %v", err)
	}
	for name, options := range map[string][]sightline.Option{
		"no key":    nil,
		"wrong key": {sightline.WithAPIKey("sl_wrong")},
	} {
		if err := listMethods(options...); !errors.Is(err, sightline.ErrUnauthenticated) {
			t.Errorf("%s gave %v, want UNAUTHENTICATED", name, err)
		}
	}
}
