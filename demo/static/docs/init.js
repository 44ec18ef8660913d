// Starts Swagger UI on the /docs page (a file of its own: the page's CSP allows no inline script).
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.url,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null  // never send the contract to the public validator service
  });
})();
