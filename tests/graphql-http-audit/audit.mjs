// Checks a running gateway the way GraphQL clients see it, and prints one
// JSON summary line last (read by tests/it/graphql_http.rs):
//
// - graphql-http's `auditServer`: the GraphQL-over-HTTP spec's server
//   audit, MUST failures as errors and SHOULD gaps as warnings;
// - the introspection GraphiQL sends (graphql-js's `getIntrospectionQuery()`,
//   equal to tests/fixtures/introspection-query.graphql) builds a client
//   schema with `buildClientSchema`, against which the contract's Panel
//   query validates: what GraphiQL's docs and autocompletion need.
//
// Usage: node audit.mjs http://127.0.0.1:4000/graphql
import { readFileSync } from 'node:fs';
import { auditServer } from 'graphql-http';
import { buildClientSchema, getIntrospectionQuery, parse, validate } from 'graphql';

const url = process.argv[2];
if (!url) {
  console.error('usage: node audit.mjs <graphql endpoint URL>');
  process.exit(2);
}

const results = await auditServer({ url });
// `notice` is a MAY the server does not do: reported, not a failure.
const counts = { ok: 0, notice: 0, warn: 0, error: 0 };
for (const result of results) {
  counts[result.status] += 1;
  const line = `${result.status.toUpperCase().padEnd(5)} ${result.id} ${result.name}`;
  if (result.status === 'ok') {
    console.log(line);
  } else {
    console.log(`${line}\n      ${result.reason}`);
    if (result.response) {
      console.log(`      HTTP ${result.response.status}: ${await result.response.text()}`);
    }
  }
}

const problems = [];
const fixture = new URL('../fixtures/introspection-query.graphql', import.meta.url);
if (readFileSync(fixture, 'utf8') !== getIntrospectionQuery()) {
  problems.push('tests/fixtures/introspection-query.graphql differs from getIntrospectionQuery()');
}
try {
  const response = await fetch(url, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      accept: 'application/graphql-response+json, application/json;q=0.9',
    },
    body: JSON.stringify({ query: getIntrospectionQuery(), operationName: 'IntrospectionQuery' }),
  });
  const answer = await response.json();
  if (response.status !== 200 || answer.errors) {
    problems.push(`introspection: HTTP ${response.status}: ${JSON.stringify(answer).slice(0, 500)}`);
  } else {
    const schema = buildClientSchema(answer.data);
    const panel = parse(
      'query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status } } }',
    );
    for (const error of validate(schema, panel)) {
      problems.push(`the Panel query does not validate against the introspected schema: ${error.message}`);
    }
  }
} catch (error) {
  problems.push(`introspection: ${error.stack ?? error}`);
}
for (const problem of problems) {
  console.log(`ERROR ${problem}`);
}

console.log(
  JSON.stringify({
    ok: counts.ok,
    notices: counts.notice,
    warnings: counts.warn,
    errors: counts.error,
    clientSchemaProblems: problems.length,
  }),
);
process.exit(counts.warn + counts.error + problems.length === 0 ? 0 : 1);
