package sightline

import (
	"google.golang.org/protobuf/types/known/structpb"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// Text is a plain-text prompt, completed as raw text.
func Text(prompt string) *sightlinev1.GenerationInput {
	return &sightlinev1.GenerationInput{Input: &sightlinev1.GenerationInput_Prompt{Prompt: prompt}}
}

// Chat is a conversation, rendered with the model's chat template.
func Chat(messages ...*sightlinev1.ChatMessage) *sightlinev1.GenerationInput {
	return &sightlinev1.GenerationInput{Input: &sightlinev1.GenerationInput_Chat{
		Chat: &sightlinev1.ChatMessages{Messages: messages},
	}}
}

// TokenIDs is a prompt of token ids, used exactly as given.
func TokenIDs(ids ...int32) *sightlinev1.GenerationInput {
	return &sightlinev1.GenerationInput{Input: &sightlinev1.GenerationInput_PromptTokenIds{
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
// for ExplainSpec.Methods. It fails on values a protobuf Struct cannot hold.
func Method(name string, params map[string]interface{}) (*sightlinev1.MethodSpec, error) {
	values, err := structpb.NewStruct(params)
	if err != nil {
		return nil, err
	}
	return &sightlinev1.MethodSpec{Name: name, Params: values}, nil
}
