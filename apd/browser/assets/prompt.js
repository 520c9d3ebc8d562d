(function () {
  "use strict";
  // P.active[fam][t]: [[unit, act], ...] largest first; P.units[fam][unit]: [max act on the held-out text, [[token, share], ...]]
  var P = JSON.parse(document.getElementById("prompt-data").textContent);
  var toks = document.querySelectorAll("#text b");
  var panel = document.getElementById("tokpanel");
  var label = document.getElementById("colour-label");
  var rows = document.querySelectorAll("tr[data-fam]");
  var state = { fam: null, unit: null, tok: null };

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function fmt(x) {
    return Number(x.toPrecision(3)).toString();
  }

  function unitLink(fam, u) {
    var a = el("a", fam + "/" + u);
    a.href = "../units/" + fam + "_" + u + ".html";
    return a;
  }

  function showToken(i) {
    panel.replaceChildren();
    var h = el("h3", "Token ");
    h.appendChild(el("span", P.tokens[i], "tok"));
    h.appendChild(document.createTextNode(" at position " + i));
    panel.appendChild(h);
    P.fams.forEach(function (fam) {
      var here = P.active[fam][i];
      panel.appendChild(el("div", fam + ": " + here.length + " active", "small muted"));
      if (!here.length) return;
      var table = el("table");
      here.forEach(function (ua) {
        var tr = el("tr");
        var td = el("td");
        td.appendChild(unitLink(fam, ua[0]));
        tr.appendChild(td);
        tr.appendChild(el("td", fmt(ua[1]), "num"));
        var info = P.units[fam][String(ua[0])];
        var bar = el("span", undefined, "bar");
        bar.style.width = Math.round(60 * Math.min(1, info[0] > 0 ? ua[1] / info[0] : 0)) + "px";
        bar.title = "activation / the unit's max on the held-out text";
        var tdb = el("td");
        tdb.appendChild(bar);
        tr.appendChild(tdb);
        var chips = el("td", undefined, "chips");
        info[1].forEach(function (t) {
          chips.appendChild(el("span", t[0], "tok"));
          chips.appendChild(el("span", Math.round(t[1] * 100) + "%", "pct"));
        });
        tr.appendChild(chips);
        table.appendChild(tr);
      });
      panel.appendChild(table);
    });
  }

  function colour(fam, u) {
    var per = P.active[fam];
    var acts = per.map(function (here) {
      for (var j = 0; j < here.length; j++) if (here[j][0] === u) return here[j][1];
      return 0;
    });
    var m = Math.max.apply(null, acts.concat([0]));
    toks.forEach(function (b, t) {
      b.style.setProperty("--a", m > 0 ? (Math.max(0, acts[t]) / m).toFixed(3) : "0");
      b.title = fam + "/" + u + ": " + (acts[t] ? fmt(acts[t]) : "0");
    });
    label.replaceChildren(document.createTextNode("coloured by "), unitLink(fam, u),
      document.createTextNode(" (max " + fmt(m) + " on this prompt)"));
    rows.forEach(function (tr) {
      tr.classList.toggle("sel", tr.getAttribute("data-fam") === fam && Number(tr.getAttribute("data-unit")) === u);
    });
    state.fam = fam;
    state.unit = u;
  }

  function pin(i) {
    toks.forEach(function (b, t) { b.classList.toggle("pin", t === i); });
    state.tok = i;
    if (i !== null) showToken(i);
  }

  function writeHash() {
    var parts = [];
    if (state.fam !== null) parts.push("fam=" + encodeURIComponent(state.fam), "unit=" + state.unit);
    if (state.tok !== null) parts.push("tok=" + state.tok);
    history.replaceState(null, "", "#" + parts.join("&"));
  }

  toks.forEach(function (b, i) {
    b.addEventListener("mouseenter", function () { if (state.tok === null) showToken(i); });
    b.addEventListener("click", function () { pin(state.tok === i ? null : i); writeHash(); });
  });
  rows.forEach(function (tr) {
    tr.addEventListener("click", function (ev) {
      if (ev.target.tagName === "A") return;
      colour(tr.getAttribute("data-fam"), Number(tr.getAttribute("data-unit")));
      writeHash();
    });
  });

  // initial view: the hash (#fam=F&unit=U&tok=T), else the first family's most active unit at its peak
  var h = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    var i = kv.indexOf("=");
    if (i > 0) h[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
  });
  var fam = null, unit = null, tok = null;
  if (h.fam !== undefined && Object.prototype.hasOwnProperty.call(P.active, h.fam) && /^\d+$/.test(h.unit || "")) {
    fam = h.fam;
    unit = Number(h.unit);
  } else if (P.first) {
    fam = P.first[0];
    unit = P.first[1];
    tok = P.first[2];
  }
  if (/^\d+$/.test(h.tok || "") && Number(h.tok) < toks.length) tok = Number(h.tok);
  if (fam !== null) colour(fam, unit);
  if (tok !== null) pin(tok);
})();
