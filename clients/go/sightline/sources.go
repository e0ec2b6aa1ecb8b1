package sightline

import (
	"fmt"
	"math"
	"sort"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// Source is one source token's contribution to an explained token.
type Source struct {
	// Position is the token's index in Explanation.Tokens.
	Position int
	Token    *sightlinev1.Token
	Score    float32
}

// Attributions decodes a method's attribution matrix: row i scores every token before the
// explained token TargetPositions[i]. An empty method picks the first result that attributes to
// tokens, in the order the methods were requested.
func Attributions(explanation *sightlinev1.Explanation, method string) ([][]float32, error) {
	result, err := attributingResult(explanation, method)
	if err != nil {
		return nil, err
	}
	return Float32Matrix(result.GetAttributions())
}

// TopSources returns the k tokens that most influenced explained token target (an index into
// TargetPositions), strongest first, by the method's attributions (empty: as for Attributions).
// Only the target's causal prefix is ranked. Ranking is by absolute score; scores keep their
// sign; ties keep the earlier position first. It ranks as the Python SDK's top_sources does.
func TopSources(explanation *sightlinev1.Explanation, method string, target, k int) ([]Source, error) {
	return topSources(explanation, method, target, k, func(*sightlinev1.Token) bool { return true })
}

// TopContentSources is TopSources over the tokens the caller wrote only (IsContent): a chat's
// message contents without the chat template's markup around them, or a text prompt. It ranks
// as the Python SDK's top_sources(..., content_only=True) does.
func TopContentSources(explanation *sightlinev1.Explanation, method string, target, k int) ([]Source, error) {
	return topSources(explanation, method, target, k, IsContent)
}

// IsContent reports whether the caller wrote the token: the content of one of the chat messages,
// or part of a text or token-id prompt; not the chat template's markup or default system prompt,
// nor generated output. Roles are set on an explanation's tokens.
func IsContent(token *sightlinev1.Token) bool {
	return token.MessageIndex != nil || token.GetRole() == sightlinev1.TokenRole_TOKEN_ROLE_PROMPT
}

func topSources(
	explanation *sightlinev1.Explanation, method string, target, k int, keep func(*sightlinev1.Token) bool,
) ([]Source, error) {
	if k < 1 {
		return nil, fmt.Errorf("sightline: k must be at least 1, got %d", k)
	}
	positions := explanation.GetTargetPositions()
	if target < 0 || target >= len(positions) {
		return nil, fmt.Errorf("sightline: target %d is out of range: %d tokens were explained", target, len(positions))
	}
	matrix, err := Attributions(explanation, method)
	if err != nil {
		return nil, err
	}
	scores := matrix[target]
	prefix := int(positions[target])
	if prefix > len(scores) || prefix > len(explanation.GetTokens()) {
		return nil, fmt.Errorf("sightline: target position %d is outside the %d attributed tokens", prefix, len(scores))
	}
	var ranked []int
	for position := 0; position < prefix; position++ {
		if keep(explanation.GetTokens()[position]) {
			ranked = append(ranked, position)
		}
	}
	sort.SliceStable(ranked, func(a, b int) bool {
		return math.Abs(float64(scores[ranked[a]])) > math.Abs(float64(scores[ranked[b]]))
	})
	if len(ranked) > k {
		ranked = ranked[:k]
	}
	sources := make([]Source, len(ranked))
	for i, position := range ranked {
		sources[i] = Source{Position: position, Token: explanation.GetTokens()[position], Score: scores[position]}
	}
	return sources, nil
}

// TargetIndex returns the index into TargetPositions of the first explained token whose text is
// text (as the tokenizer renders it alone, e.g. " Paris" with its leading space).
func TargetIndex(explanation *sightlinev1.Explanation, text string) (int, bool) {
	for index, position := range explanation.GetTargetPositions() {
		if int(position) < len(explanation.GetTokens()) && explanation.GetTokens()[position].GetText() == text {
			return index, true
		}
	}
	return 0, false
}

func attributingResult(explanation *sightlinev1.Explanation, method string) (*sightlinev1.MethodResult, error) {
	var names []string
	for _, result := range explanation.GetResults() {
		// Methods that do not attribute to tokens leave the tensor empty or unset, which read the same.
		attributes := len(result.GetAttributions().GetShape()) > 0 || len(result.GetAttributions().GetFloatValues()) > 0
		if (method == "" && attributes) || result.GetMethod() == method {
			if !attributes {
				return nil, fmt.Errorf("sightline: method %q does not attribute to tokens", method)
			}
			return result, nil
		}
		names = append(names, result.GetMethod())
	}
	if method == "" {
		return nil, fmt.Errorf("sightline: no result attributes to tokens; results: %v", names)
	}
	return nil, fmt.Errorf("sightline: no result of method %q; results: %v", method, names)
}
