// The generated messages and service descriptors (buf generate, protoc-gen-es), for fields and calls the
// hand-written layer does not cover: `import { proto } from "@sightline/client"`.
export * from "./gen/sightline/v1/audit_pb.js";
export * from "./gen/sightline/v1/explanations_pb.js";
export * from "./gen/sightline/v1/inference_pb.js";
export * from "./gen/sightline/v1/types_pb.js";
