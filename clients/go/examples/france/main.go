// Command france asks the model what the capital of France is, with the answer explained, and
// prints which words of the question made it say " Paris" (the README's example).
//
//	go run ./examples/france -target 127.0.0.1:50051
package main

import (
	"context"
	"flag"
	"fmt"
	"log"

	"github.com/sightline/sightline-go/sightline"
	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the gateway's host:port")
	flag.Parse()

	client, err := sightline.Dial(*target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	response, err := client.Inference.Generate(context.Background(), &sightlinev1.GenerateRequest{
		Input:   sightline.Chat(sightline.User("What is the capital of France?")),
		Explain: sightline.Explain("input_x_gradient", "logit_lens"),
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(response.Text) // The capital of France is Paris.
	explanation := response.Explanation
	fmt.Println(explanation.Fidelity.MaxAbsLogprobDiff) // ~1e-5: the explainer reproduces vLLM
	paris, found := sightline.TargetIndex(explanation, " Paris")
	if !found {
		log.Fatal("the answer has no token \" Paris\"")
	}
	sources, err := sightline.TopContentSources(explanation, "input_x_gradient", paris, 3)
	if err != nil {
		log.Fatal(err)
	}
	for _, source := range sources {
		fmt.Printf("%d %q %+.4f\n", source.Position, source.Token.Text, source.Score)
	}
}
