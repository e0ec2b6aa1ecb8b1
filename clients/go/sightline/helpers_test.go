package sightline

import (
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers the codec grpc-go sends messages with
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

func float32Tensor(shape []int32, values ...float32) *sightlinev1.Tensor {
	return &sightlinev1.Tensor{Dtype: sightlinev1.Dtype_DTYPE_FLOAT32, Shape: shape, FloatValues: values}
}

func TestFloat32MatrixSplitsRowMajorValuesIntoRows(t *testing.T) {
	matrix, err := Float32Matrix(float32Tensor([]int32{2, 3}, 1, -2.5, 3, 0, float32(math.Inf(1)), 1e-30))
	if err != nil {
		t.Fatal(err)
	}
	want := [][]float32{{1, -2.5, 3}, {0, float32(math.Inf(1)), 1e-30}}
	if !reflect.DeepEqual(matrix, want) {
		t.Fatalf("got %v, want %v", matrix, want)
	}
	// Rows are capped at their length: appending to one must not overwrite the next.
	_ = append(matrix[0], 42)
	if matrix[1][0] != 0 {
		t.Fatalf("appending to row 0 changed row 1: %v", matrix[1])
	}
}

func TestTensorDecodingRefusesWhatDoesNotFit(t *testing.T) {
	int32Tensor := &sightlinev1.Tensor{Dtype: sightlinev1.Dtype_DTYPE_INT32, Shape: []int32{2}, IntValues: []int32{1, 2}}
	for _, c := range []struct {
		name   string
		tensor *sightlinev1.Tensor
		want   string
	}{
		{"nil", nil, "no tensor"},
		{"wrong dtype", int32Tensor, "is DTYPE_INT32, not DTYPE_FLOAT32"},
		{"too few values", float32Tensor([]int32{2, 2}, 1, 2, 3), "3 elements do not fill a tensor of shape [2 2]"},
		{"values of the other dtype", &sightlinev1.Tensor{Dtype: sightlinev1.Dtype_DTYPE_FLOAT32, Shape: []int32{2}, IntValues: []int32{1, 2}}, "0 elements do not fill"},
		{"negative axis", float32Tensor([]int32{-1}), "impossible"},
		{"overflowing shape", float32Tensor([]int32{1 << 30, 1 << 30}), "impossible"},
		{"not a matrix", float32Tensor([]int32{3}, 1, 2, 3), "shape [3] is not a matrix"},
	} {
		if _, err := Float32Matrix(c.tensor); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

func TestInt32ValuesKeepsShapeAndSign(t *testing.T) {
	values, shape, err := Int32Values(&sightlinev1.Tensor{Dtype: sightlinev1.Dtype_DTYPE_INT32, Shape: []int32{1, 1, 3}, IntValues: []int32{7, -3, 1 << 30}})
	if err != nil || !reflect.DeepEqual(values, []int32{7, -3, 1 << 30}) || !reflect.DeepEqual(shape, []int{1, 1, 3}) {
		t.Fatalf("got %v %v %v", values, shape, err)
	}
}

// An explanation of tokens a b c d, explaining c (position 2) and d (position 3); a is chat
// template markup, b the user's words.
func explanationOfFourTokens() *sightlinev1.Explanation {
	user := int32(0)
	tokens := []*sightlinev1.Token{
		{Id: 1, Text: "a", Role: sightlinev1.TokenRole_TOKEN_ROLE_TEMPLATE},
		{Id: 2, Text: " b", Role: sightlinev1.TokenRole_TOKEN_ROLE_USER, MessageIndex: &user},
		{Id: 3, Text: " Paris", Role: sightlinev1.TokenRole_TOKEN_ROLE_OUTPUT},
		{Id: 4, Text: ".", Role: sightlinev1.TokenRole_TOKEN_ROLE_OUTPUT},
	}
	return &sightlinev1.Explanation{
		Tokens:          tokens,
		PromptLength:    2,
		TargetPositions: []int32{2, 3},
		Results: []*sightlinev1.MethodResult{
			{Method: "logit_lens"},
			// Row 1 ties |0.5| at positions 0 and 2: the earlier position ranks first.
			{Method: "saliency", Attributions: float32Tensor([]int32{2, 3}, 0.1, -0.9, 0, 0.5, 0.2, -0.5)},
		},
	}
}

func TestTopSourcesRanksTheCausalPrefixByAbsoluteScore(t *testing.T) {
	explanation := explanationOfFourTokens()
	target, found := TargetIndex(explanation, " Paris")
	if !found || target != 0 {
		t.Fatalf("TargetIndex(\" Paris\") = %d, %v", target, found)
	}
	sources, err := TopSources(explanation, "", target, 5)
	if err != nil {
		t.Fatal(err)
	}
	// Position 2 is the target itself: not ranked, although k leaves room for it.
	got := fmt.Sprint(describe(sources))
	if got != "[1 \" b\" -0.9 0 \"a\" 0.1]" {
		t.Fatalf("got %s", got)
	}
	sources, err = TopSources(explanation, "saliency", 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(describe(sources)); got != "[0 \"a\" 0.5 2 \" Paris\" -0.5]" {
		t.Fatalf("got %s", got)
	}
}

func TestTopContentSourcesRanksOnlyTheCallersTokens(t *testing.T) {
	explanation := explanationOfFourTokens()
	// Of row 1's prefix (a, b, Paris), only b is the caller's: a is template, Paris output.
	sources, err := TopContentSources(explanation, "saliency", 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(describe(sources)); got != "[1 \" b\" 0.2]" {
		t.Fatalf("got %s", got)
	}
	prompt := &sightlinev1.Token{Role: sightlinev1.TokenRole_TOKEN_ROLE_PROMPT}
	system := &sightlinev1.Token{Role: sightlinev1.TokenRole_TOKEN_ROLE_SYSTEM}
	if !IsContent(prompt) || IsContent(system) {
		t.Fatal("a text prompt's tokens are the caller's; the template's default system prompt is not")
	}
}

func describe(sources []Source) []interface{} {
	var parts []interface{}
	for _, source := range sources {
		parts = append(parts, source.Position, fmt.Sprintf("%q", source.Token.GetText()), source.Score)
	}
	return parts
}

func TestTopSourcesSaysWhatIsMissing(t *testing.T) {
	explanation := explanationOfFourTokens()
	for _, c := range []struct {
		method    string
		target, k int
		want      string
	}{
		{"logit_lens", 0, 3, `method "logit_lens" does not attribute to tokens`},
		{"occlusion", 0, 3, `no result of method "occlusion"; results: [logit_lens saliency]`},
		{"", 2, 3, "target 2 is out of range: 2 tokens were explained"},
		{"", 0, 0, "k must be at least 1, got 0"},
	} {
		if _, err := TopSources(explanation, c.method, c.target, c.k); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("TopSources(%q, %d, %d): got %v, want %q", c.method, c.target, c.k, err, c.want)
		}
	}
	if _, found := TargetIndex(explanation, "Paris"); found {
		t.Error("TargetIndex matched a token text without its leading space")
	}
}

func TestErrorsAreTypedByStatusCode(t *testing.T) {
	err := AsError(status.Error(codes.InvalidArgument, "unknown method 'x'"))
	var typed *Error
	if !errors.As(err, &typed) || typed.Code != codes.InvalidArgument || typed.Message != "unknown method 'x'" {
		t.Fatalf("got %#v", err)
	}
	if !errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrUnauthenticated) || !typed.CallerError() {
		t.Fatal("an INVALID_ARGUMENT error must match ErrInvalidArgument only, and be the caller's")
	}
	if status.Code(err) != codes.InvalidArgument || err.Error() != "InvalidArgument: unknown method 'x'" {
		t.Fatalf("status.Code %v, text %q", status.Code(err), err.Error())
	}
	if AsError(status.Error(codes.Unavailable, "down")).(*Error).CallerError() {
		t.Fatal("UNAVAILABLE is not the caller's fault")
	}
	if AsError(nil) != nil || AsError(io.EOF) != io.EOF {
		t.Fatal("nil and io.EOF must pass unchanged")
	}
	// A sentinel does not match an error of the same code that carries its own message.
	if errors.Is(ErrNotFound, err) {
		t.Fatal("errors.Is must compare against sentinels, not any error of the code")
	}
}

func TestPromptBuildersFillTheInputOneof(t *testing.T) {
	chat := Chat(System("Be brief."), User("What is the capital of France?"))
	if got := chat.GetChat().GetMessages(); len(got) != 2 || got[1].GetRole() != "user" || got[0].GetRole() != "system" {
		t.Fatalf("got %v", chat)
	}
	if Text("The capital of France is").GetPrompt() != "The capital of France is" {
		t.Fatal("Text lost its prompt")
	}
	if ids := TokenIDs(1, 2, 3).GetPromptTokenIds().GetIds(); !reflect.DeepEqual(ids, []int32{1, 2, 3}) {
		t.Fatalf("got %v", ids)
	}
	spec := Explain("input_x_gradient", "logit_lens")
	if spec.GetMode() != sightlinev1.ExplainMode_EXPLAIN_MODE_SYNC || len(spec.GetMethods()) != 2 || spec.GetMethods()[1].GetName() != "logit_lens" {
		t.Fatalf("got %v", spec)
	}
	method, err := Method("integrated_gradients", map[string]interface{}{"steps": 32, "baseline": "zeros", "absolute": true, "alpha": 0.5})
	if err != nil {
		t.Fatal(err)
	}
	params := method.GetParams()
	if params["steps"].GetKind().(*sightlinev1.ParamValue_IntValue).IntValue != 32 ||
		params["baseline"].GetStringValue() != "zeros" || !params["absolute"].GetBoolValue() || params["alpha"].GetFloatValue() != 0.5 {
		t.Fatalf("got %v", params)
	}
	for _, bad := range []interface{}{struct{}{}, int64(1) << 40, uint(3)} {
		if _, err := Method("x", map[string]interface{}{"p": bad}); err == nil {
			t.Errorf("the parameter value %v (%T) must be refused", bad, bad)
		}
	}
}

// grpc-go sends messages with the codec of the golang/protobuf module it was built against:
// this checks that Debian's build of it round-trips the generated (protobuf APIv2) messages,
// oneofs, maps and optional fields included.
func TestGRPCCodecRoundTripsGeneratedMessages(t *testing.T) {
	maxTokens := int32(16)
	request := &sightlinev1.GenerateRequest{
		Input:    Chat(User("What is the capital of France?")),
		Sampling: &sightlinev1.SamplingParams{MaxTokens: &maxTokens},
		Explain:  Explain("logit_lens"),
	}
	response := &sightlinev1.GenerateResponse{Explanation: &sightlinev1.Explanation{Results: []*sightlinev1.MethodResult{{
		Method: "logit_lens",
		Extras: map[string]*sightlinev1.Tensor{"target_logprobs": float32Tensor([]int32{1, 1}, -0.5)},
	}}}}
	codec := encoding.GetCodec("proto")
	for _, message := range []proto.Message{request, response} {
		wire, err := codec.Marshal(message)
		if err != nil {
			t.Fatal(err)
		}
		decoded := message.ProtoReflect().New().Interface()
		if err := codec.Unmarshal(wire, decoded); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(message, decoded) {
			t.Fatalf("round trip changed %v into %v", message, decoded)
		}
	}
}

func TestTopCellsRanksEveryPicturesCellsWithBoxesInTheOriginal(t *testing.T) {
	// Two 2 x 2 grids over 224 x 224 seen pixels; picture 0 was sent at 448 x 448, picture 1 at 112 x 224.
	grid := func(index, width, height int32) *sightlinev1.ImageGrid {
		return &sightlinev1.ImageGrid{
			ImageIndex: index, Rows: 2, Cols: 2, Height: 224, Width: 224, RowEdges: []int32{0, 112, 224},
			ColEdges: []int32{0, 112, 224}, OriginalWidth: width, OriginalHeight: height,
		}
	}
	explanation := &sightlinev1.Explanation{
		TargetPositions: []int32{3, 4},
		ImageGrids:      []*sightlinev1.ImageGrid{grid(0, 448, 448), grid(1, 112, 224)},
		Results: []*sightlinev1.MethodResult{
			{Method: "saliency", Attributions: float32Tensor([]int32{2, 4}, 1, 2, 3, 4, 5, 6, 7, 8)},
			{Method: "occlusion", ImageAttributions: []*sightlinev1.ImageAttribution{
				{ImageIndex: 0, Cells: float32Tensor([]int32{2, 2, 2}, 0.25, 0, 0, 0.5, 0, -0.75, 0.125, 0)},
				{ImageIndex: 1, Cells: float32Tensor([]int32{2, 2, 2}, 0, 0.375, 0, 0, -0.5, 0, 0, 0)},
			}},
		},
	}
	cells, err := TopCells(explanation, "", 0, 3)
	if err != nil {
		t.Fatal(err)
	}
	want := []Cell{
		{ImageIndex: 0, Row: 1, Col: 1, Box: Box{224, 224, 448, 448}, Score: 0.5},
		{ImageIndex: 1, Row: 0, Col: 1, Box: Box{56, 0, 112, 112}, Score: 0.375},
		{ImageIndex: 0, Row: 0, Col: 0, Box: Box{0, 0, 224, 224}, Score: 0.25},
	}
	if !reflect.DeepEqual(cells, want) {
		t.Fatalf("got %+v, want %+v", cells, want)
	}
	second, err := TopCells(explanation, "occlusion", 1, 1)
	if err != nil || !reflect.DeepEqual(second, []Cell{{ImageIndex: 0, Row: 0, Col: 1, Box: Box{224, 0, 448, 224}, Score: -0.75}}) {
		t.Fatalf("target 1: got %+v, %v", second, err)
	}
	if _, err := TopCells(explanation, "saliency", 0, 1); err == nil || !strings.Contains(err.Error(), "scores no picture cells") {
		t.Fatalf("saliency: got %v", err)
	}
	if _, err := TopCells(explanation, "", 2, 1); err == nil || !strings.Contains(err.Error(), "do not hold target 2") {
		t.Fatalf("target 2: got %v", err)
	}
}
