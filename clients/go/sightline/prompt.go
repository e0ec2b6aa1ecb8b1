package sightline

import (
	"fmt"
	"math"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// Text is a plain-text prompt, completed as raw text.
func Text(prompt string) *sightlinev1.GenerationInput {
	return &sightlinev1.GenerationInput{Kind: &sightlinev1.GenerationInput_Prompt{Prompt: prompt}}
}

// Chat is a conversation, rendered with the model's chat template.
func Chat(messages ...*sightlinev1.ChatMessage) *sightlinev1.GenerationInput {
	return &sightlinev1.GenerationInput{Kind: &sightlinev1.GenerationInput_Chat{
		Chat: &sightlinev1.ChatMessages{Messages: messages},
	}}
}

// TokenIDs is a prompt of token ids, used exactly as given.
func TokenIDs(ids ...int32) *sightlinev1.GenerationInput {
	return &sightlinev1.GenerationInput{Kind: &sightlinev1.GenerationInput_PromptTokenIds{
		PromptTokenIds: &sightlinev1.TokenIds{Ids: ids},
	}}
}

// System, User and Assistant are chat messages of each role.
func System(content string) *sightlinev1.ChatMessage {
	return &sightlinev1.ChatMessage{Role: "system", Content: content}
}

func User(content string) *sightlinev1.ChatMessage {
	return &sightlinev1.ChatMessage{Role: "user", Content: content}
}

func Assistant(content string) *sightlinev1.ChatMessage {
	return &sightlinev1.ChatMessage{Role: "assistant", Content: content}
}

// Explain asks for the named methods with their default parameters, the explanation attached to
// the response (SYNC mode). Set the returned spec's fields for more (Mode, Targets, Aggregation,
// Faithfulness); ListMethods names the methods and their parameters.
func Explain(methods ...string) *sightlinev1.ExplainSpec {
	spec := &sightlinev1.ExplainSpec{Mode: sightlinev1.ExplainMode_EXPLAIN_MODE_SYNC}
	for _, name := range methods {
		spec.Methods = append(spec.Methods, &sightlinev1.MethodSpec{Name: name})
	}
	return spec
}

// Method is one method with parameters, e.g. Method("integrated_gradients", map[string]interface{}{"steps": 32}),
// for ExplainSpec.Methods. Values are Go ints (int, int32, int64 within int32's range), floats,
// strings or bools, as ListMethods types them; Method fails on anything else.
func Method(name string, params map[string]interface{}) (*sightlinev1.MethodSpec, error) {
	spec := &sightlinev1.MethodSpec{Name: name, Params: map[string]*sightlinev1.ParamValue{}}
	for param, value := range params {
		converted, err := paramValue(value)
		if err != nil {
			return nil, fmt.Errorf("sightline: %s parameter %s: %w", name, param, err)
		}
		spec.Params[param] = converted
	}
	return spec, nil
}

func paramValue(value interface{}) (*sightlinev1.ParamValue, error) {
	switch typed := value.(type) {
	case int:
		return intParam(int64(typed))
	case int32:
		return intParam(int64(typed))
	case int64:
		return intParam(typed)
	case float32:
		return &sightlinev1.ParamValue{Kind: &sightlinev1.ParamValue_FloatValue{FloatValue: float64(typed)}}, nil
	case float64:
		return &sightlinev1.ParamValue{Kind: &sightlinev1.ParamValue_FloatValue{FloatValue: typed}}, nil
	case string:
		return &sightlinev1.ParamValue{Kind: &sightlinev1.ParamValue_StringValue{StringValue: typed}}, nil
	case bool:
		return &sightlinev1.ParamValue{Kind: &sightlinev1.ParamValue_BoolValue{BoolValue: typed}}, nil
	}
	return nil, fmt.Errorf("%v is a %T, not an int, float, string or bool", value, value)
}

func intParam(value int64) (*sightlinev1.ParamValue, error) {
	if value < math.MinInt32 || value > math.MaxInt32 {
		return nil, fmt.Errorf("%d does not fit an int32", value)
	}
	return &sightlinev1.ParamValue{Kind: &sightlinev1.ParamValue_IntValue{IntValue: int32(value)}}, nil
}
