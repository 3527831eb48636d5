// Starts GraphiQL on the gateway's own page (src/http/graphiql.rs). Kept out
// of the HTML so that the page's Content-Security-Policy can refuse every
// inline script; the gateway's settings come in a JSON block instead.
(function () {
  'use strict';
  var settings = JSON.parse(document.getElementById('graphiql-settings').textContent);
  // The page is served by the GraphQL endpoint itself (GET /graphql with
  // Accept: text/html), so its own address is the endpoint's, also behind a
  // proxy that adds a path prefix or terminates TLS.
  var endpoint = new URL(window.location.pathname, window.location.href);
  // Subscriptions: graphql-transport-ws on the same path. GraphiQL sends the
  // Headers tab's JSON as connection_init's payload, where the gateway reads
  // credentials (Authorization or x-api-key).
  var subscriptions = new URL(endpoint.href);
  subscriptions.protocol = endpoint.protocol === 'https:' ? 'wss:' : 'ws:';
  var fetcher = GraphiQL.createFetcher({
    url: endpoint.href,
    subscriptionUrl: subscriptions.href,
  });
  ReactDOM.createRoot(document.getElementById('graphiql')).render(
    React.createElement(GraphiQL, {
      fetcher: fetcher,
      // Every visit opens on the contract's example, ready to run: GraphiQL
      // activates the tab that holds it (adding it when the user's tabs,
      // kept in this browser, have none). These are initial values only.
      query: settings.query,
      variables: settings.variables,
      headers: settings.headers || undefined,
      defaultEditorToolsVisibility: settings.headers ? 'headers' : 'variables',
      isHeadersEditorEnabled: true,
      // Credentials typed into the Headers tab stay out of local storage.
      shouldPersistHeaders: false,
    })
  );
})();
