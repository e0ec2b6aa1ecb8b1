// Validates KEDA ScaledObjects against @kubernetes-models/keda, whose validators are generated from KEDA's own
// CustomResourceDefinitions (the schema the cluster's API server would apply).
// Input: a JSON array of ScaledObjects on stdin. Output: one line per object, "ok NAME" or "invalid NAME: why";
// exit status 1 when any is invalid.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const objects = JSON.parse(readFileSync(0, "utf8"));
let invalid = 0;
for (const object of objects) {
  const name = object?.metadata?.name ?? "(no name)";
  try {
    new ScaledObject(object).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    invalid += 1;
    console.log(`invalid ${name}: ${error.message}`);
  }
}
process.exit(invalid ? 1 : 0);
