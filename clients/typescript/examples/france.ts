// The README's example: the France question, explained. Run: node dist/examples/france.js [host:port]
import { Client } from "@sightline/client";

const client = new Client(process.argv[2] ?? "127.0.0.1:50051");
const generation = await client.generate([{ role: "user", content: "What is the capital of France?" }], {
  explain: ["input_x_gradient"],
});
console.log(generation.text); // The capital of France is Paris.
const explanation = generation.explanation!;
const paris = explanation.targetPositions.findIndex((position) => explanation.tokens[position].text === " Paris");
for (const source of explanation.topSources(paris, 3, { contentOnly: true })) {
  console.log(source.position, JSON.stringify(source.token.text), source.score.toFixed(4));
}
client.close();
