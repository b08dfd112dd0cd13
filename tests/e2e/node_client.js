#!/usr/bin/env node
// A Node gRPC client for protoserve, used by tests/e2e/test_node_client.py to
// check that another language's gRPC stack can talk to the server through the
// .proto files alone.
//
// usage: node node_client.js --target HOST:PORT --include DIR [--include DIR ...]
//            [--model NAME] [--inputs TEXT] [--max-new-tokens N] [--seed N]
//            [--timeout-ms MS]
//
// The include dirs must hold protoserve/inference/v1/inference_service.proto
// (the repo's protos/), google/api/annotations.proto (googleapis-common-protos)
// and google/protobuf/descriptor.proto (protobufjs ships one).
//
// Prints one JSON object summarising Generate, GenerateStream and a call to an
// unknown model; exits 1 with a message on stderr if a call fails unexpectedly.
"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = "protoserve/inference/v1/inference_service.proto";

function parseArgs(argv) {
  const args = {
    target: null,
    include: [],
    model: "bytelm",
    inputs: "def ",
    maxNewTokens: 8,
    seed: 1,
    timeoutMs: 30000,
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    i++;
    switch (flag) {
      case "--target": args.target = value; break;
      case "--include": args.include.push(value); break;
      case "--model": args.model = value; break;
      case "--inputs": args.inputs = value; break;
      case "--max-new-tokens": args.maxNewTokens = Number(value); break;
      case "--seed": args.seed = Number(value); break;
      case "--timeout-ms": args.timeoutMs = Number(value); break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  if (!args.target) throw new Error("--target is required");
  if (args.include.length === 0) throw new Error("at least one --include is required");
  return args;
}

function deadline(args) {
  return new Date(Date.now() + args.timeoutMs);
}

function request(args) {
  return {
    model: args.model,
    inputs: args.inputs,
    parameters: { maxNewTokens: args.maxNewTokens, seed: String(args.seed) },
  };
}

function generate(client, args) {
  return new Promise((resolve, reject) => {
    client.Generate(request(args), { deadline: deadline(args) }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

function generateStream(client, args) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client.GenerateStream(request(args), { deadline: deadline(args) });
    call.on("data", (message) => messages.push(message));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

function unknownModelCode(client, args) {
  return new Promise((resolve) => {
    const bad = { ...request(args), model: "no-such-model" };
    client.Generate(bad, { deadline: deadline(args) }, (err) => {
      resolve(err ? grpc.status[err.code] : "OK");
    });
  });
}

function hasFinishReason(message) {
  return Boolean(message.finishReason) && message.finishReason !== "FINISH_REASON_UNSPECIFIED";
}

function usage(u) {
  if (!u) return null;
  return {
    promptTokens: u.promptTokens,
    completionTokens: u.completionTokens,
    totalTokens: u.totalTokens,
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync(PROTO, {
    includeDirs: args.include,
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  const Service = pkg.protoserve.inference.v1.InferenceService;
  const client = new Service(args.target, grpc.credentials.createInsecure());
  try {
    const unary = await generate(client, args);
    const stream = await generateStream(client, args);
    const last = stream.length ? stream[stream.length - 1] : null;
    const withFinish = stream.map(hasFinishReason);
    const withUsage = stream.map((m) => m.usage != null);
    const summary = {
      generate: {
        textLength: unary.generatedText.length,
        tokenIds: unary.tokenIds.length,
        finishReason: unary.finishReason,
        usage: usage(unary.usage),
        model: unary.model,
      },
      stream: {
        messages: stream.length,
        textLength: stream.reduce((n, m) => n + m.text.length, 0),
        tokenIds: stream.reduce((n, m) => n + m.tokenIds.length, 0),
        lastFinishReason: last ? last.finishReason : null,
        lastUsage: last ? usage(last.usage) : null,
        onlyLastHasFinishReason:
          withFinish.length > 0 && withFinish.every((has, i) => has === (i === stream.length - 1)),
        onlyLastHasUsage:
          withUsage.length > 0 && withUsage.every((has, i) => has === (i === stream.length - 1)),
      },
      unknownModel: await unknownModelCode(client, args),
    };
    process.stdout.write(JSON.stringify(summary) + "\n");
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`node_client: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
